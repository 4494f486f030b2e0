"""comfy-bridge's command-line client (`python -m client`) and runnable examples; standard library only."""
