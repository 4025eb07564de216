"""Dataset quality measures: near-duplicates, diversity, balance, privacy (plain functions)."""
