"""The option sets that the library, its command line and params.yaml share: one definition each."""

FEATURE_SPACES = ("inception", "pixel", "classifier")  # FID/IS space, and the demo's offline ones
SOLVERS = ("dopri5", "heun", "euler")  # probability-flow ODE solvers (dopri5 is the reference's)
NORM_ORDERS = ("norm_first", "cfg_first", "both")  # where guidance applies the latent LayerNorm
SHARD_STORES = ("png", "npy", "source")  # lossless crop, its raw pixels, the untouched source bytes


def has_type(value: object, expected: type | None | tuple) -> bool:
    """Whether a config value has the expected type as YAML and JSON give them: a bool is no int
    (`true` is not a count), an int is a float, None matches None, a tuple any of its types."""
    if isinstance(expected, tuple):
        return any(has_type(value, option) for option in expected)
    if expected is None:
        return value is None
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)
