"""t2i-fast: Reed et al. (ICML 2016) text-to-image GANs, trained fast."""

__version__ = "0.1.0"
