"""The option sets that the library, its command line and params.yaml share: one definition each."""

FEATURE_SPACES = ("inception", "pixel", "classifier")  # FID/IS space, and the demo's offline ones
SOLVERS = ("dopri5", "heun", "euler")  # probability-flow ODE solvers (dopri5 is the reference's)
NORM_ORDERS = ("norm_first", "cfg_first", "both")  # where guidance applies the latent LayerNorm
SHARD_STORES = ("png", "npy", "source")  # lossless crop, its raw pixels, the untouched source bytes
