"""layerskip: train small language models with LayerSkip, then decode faster by skipping layers.

    import layerskip

    model = layerskip.load("runs/layerskip")
    out = layerskip.generate(model, "The game", max_new_tokens=32, mode="ssd", draft_layer=3, k=4)
    print(out.text)

See layerskip.api for load, generate, evaluate, calibrate and train.
"""

__version__ = "0.1.0"

from layerskip.api import Generation, calibrate, evaluate, generate, load, train  # noqa: E402

__all__ = ["Generation", "__version__", "calibrate", "evaluate", "generate", "load", "train"]
