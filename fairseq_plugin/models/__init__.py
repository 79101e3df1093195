"""The plugin's fairseq models: every module in this folder is imported (and so
registers its models and architectures), as fairseq does for its own ``models/``."""
import importlib
import os

_here = os.path.dirname(__file__)
for _file in sorted(os.listdir(_here)):
    _path = os.path.join(_here, _file)
    if _file.startswith(("_", ".")):
        continue
    if _file.endswith(".py") or (os.path.isdir(_path)
                                 and os.path.exists(os.path.join(_path, "__init__.py"))):
        importlib.import_module(f"{__name__}.{_file[:-3] if _file.endswith('.py') else _file}")
