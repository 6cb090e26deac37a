"""The option sets that the library, its command line and params.yaml share: one definition each."""

FEATURE_SPACES = ("inception", "pixel", "classifier")  # FID/IS space, and the demo's offline ones
SOLVERS = ("dopri5", "heun", "euler")  # probability-flow ODE solvers (dopri5 is the reference's)
NORM_ORDERS = ("norm_first", "cfg_first", "both")  # where guidance applies the latent LayerNorm
SHARD_STORES = ("png", "npy", "source")  # lossless crop, its raw pixels, the untouched source bytes
PROTOCOLS = ("separate", "reference")  # evaluation protocols (unite.evaluation.EvaluationProtocol)
# What the CFG search minimises: the Frechet distance (FID in Inception space) or the kernel distance
# (KID in Inception space, torch-fidelity's: the mean over random subsets of the features)
SEARCH_METRICS = ("frechet_distance", "kernel_distance")


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


def check_choice(key: str, value: object, options: tuple, error: type[Exception] = ValueError) -> None:
    """`value` is one of `options`; otherwise `error` names the key, the value and the options."""
    if value not in options:
        raise error(f"{key}={value!r}: must be one of {list(options)}")


def check_interval(key: str, interval: object, error: type[Exception] = ValueError) -> None:
    """A guidance interval: two numbers with 0 <= low < high <= 1."""
    if (not isinstance(interval, (list, tuple)) or len(interval) != 2 or not all(has_type(v, float) for v in interval)
            or not 0 <= interval[0] < interval[1] <= 1):
        raise error(f"{key}={interval!r}: must be [low, high] with 0 <= low < high <= 1")
