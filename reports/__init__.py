"""HTML reports of recordings: model.py (numbers), figures.py (plotly),
html.py and templates/ (one self-contained file), cli.py (`overcommit report`).
Presentation only: no kernel access, no root, no bcc."""
