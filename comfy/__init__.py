"""Everything that talks to ComfyUI or decides where a job runs."""
