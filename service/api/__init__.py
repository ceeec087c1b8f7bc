"""The HTTP layer: dependencies (`deps`) and routes (`routes/<resource>.py`)."""
