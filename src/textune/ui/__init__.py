"""`textune ui`: a local web app to launch, watch, compare and try runs, offline.

- `runs`: reading the runs folder (which folders are runs, their status, the table's rows, one run's details).
- `launcher`: starting `textune train` in its own process, stopping it as Ctrl-C does, resuming it.
- `form`: the new-run form's fields, read off textune's typed config; the shipped configs.
- `app`: the FastAPI app and its JSON API (documented at /docs); `pages`: the server-rendered pages;
  `playground`: trying a run's model, as its task describes its inputs and outputs.
- `server`: `run_ui`, what `textune ui` runs.
- `static/`: the pages' script and style, and uPlot (vendored, MIT) for the curves.
"""
