"""Optional tqdm progress bars (nothing when tqdm is missing or the bar is off)."""

from __future__ import annotations


def progress_bar(enabled: bool = True, **kwargs):
    """A `tqdm.auto.tqdm(**kwargs)` bar, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(**kwargs)
