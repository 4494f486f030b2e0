"""comfy-bridge's command-line client (`python -m client`, standard library only) and runnable API examples."""
