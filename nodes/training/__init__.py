"""The trainer (CLI and node), one target file per mechanism, personalization and prompt tokens: the top
layer, importing the mechanisms it trains.
"""
