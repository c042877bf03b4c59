"""automerge-mk: per-block Bayesian-optimised model merging on top of mergekit."""

__version__ = "0.1.0"
