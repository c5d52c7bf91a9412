"""Bundled ALFWorld game (data only), written by make_games.py."""
