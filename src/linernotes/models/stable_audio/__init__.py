"""The stable-audio family: a user's own diffusers StableAudioPipeline as a run (`family.py`), its
features (`latents.py`), its Task (`task.py`) and its folder (`folder.py`)."""
