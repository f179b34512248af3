"""trojanlab: attack, scan and purify image classifiers against backdoors (trojans)."""

__version__ = "0.1.0"
