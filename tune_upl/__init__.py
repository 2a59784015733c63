"""tune_upl: hyper-parameter search for proxy-based deep metric learning on Ray Tune + Optuna."""
__version__ = "0.2.0"
