"""Hand-authored ALFRED-style games for ALFWorld's text engine (see make_games.py)."""
