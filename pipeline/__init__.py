"""Train hierarchical convolutional VAEs on sharded image datasets; ship their encoders."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import pipeline` (e.g. for the config) does not pay for torch.
    if name == "Encoder":
        from pipeline.encoder import Encoder

        return Encoder
    raise AttributeError(name)


__all__ = ["Encoder", "__version__"]
