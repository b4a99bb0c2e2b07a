from pipeline.model.vae import VAE, BottomUp, TopDown

__all__ = ["VAE", "BottomUp", "TopDown"]
