"""Shared pieces of the recipes: data from packages, vocabularies, results files."""
