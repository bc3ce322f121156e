"""cpt: Configurable Preference Tuning as a batch job suite."""

__version__ = "0.1.0"
