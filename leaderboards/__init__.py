"""Leaderboards: tables, HTML report and regression checks built from the results store."""
