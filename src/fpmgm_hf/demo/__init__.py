"""The web demo's logic (`app`: loading, streaming runs) and its rendering helpers (`render`); `app.py` at the
repository root is the Gradio front end."""
