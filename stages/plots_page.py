"""Write the HTML template that `dvc plots show/diff` fill (`plots.html_template` in .dvc/config):
`python -m stages.plots_page`.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so it stays blank offline.
This template carries them inline instead, from the bundle that vl-convert-python ships (no
download), and has no `{scripts}` placeholder, so DVC's CDN script tags are left out. The template
is committed; rerun this after upgrading vl-convert-python to refresh the libraries.
"""

import argparse
from importlib.metadata import version
from pathlib import Path

import vl_convert

TEMPLATE = Path(".dvc/plots.html")
# DVC's linear/scatter/... templates declare Vega-Lite v5 specs.
VEGA_LITE = "5.21"
# The bundle runs inside a function, so that its top-level names cannot clash with the global
# `var spec` of each plot's script that DVC inserts.
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>DVC plots</title>
<!-- Vega {vega}, Vega-Lite {vega_lite}, vega-embed {embed}: inline from vl-convert-python {package},
     written by `python -m stages.plots_page`. The page loads nothing from the network. -->
<script>
(() => {{
{bundle}
}})();
</script>
<style>
body {{ font-family: sans-serif; }}
table {{ border-spacing: 15px; }}
img {{ image-rendering: pixelated; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def render() -> str:
    """The template's text: DVC's `{plot_divs}` and `{refresh_tag}` placeholders, the libraries inline."""
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    for marker in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if marker in bundle:  # would end the inline script early, or be replaced by DVC
            raise RuntimeError(f"vl_convert.javascript_bundle() contains {marker!r}; it cannot be inlined as is")
    return PAGE.format(bundle=bundle, vega=vl_convert.get_vega_version(), vega_lite=VEGA_LITE,
                       embed=vl_convert.get_vega_embed_version(), package=version("vl-convert-python"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.plots_page", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TEMPLATE, help="where to write it (default: %(default)s)")
    args = parser.parse_args()
    args.out.write_text(render())
    print(f"plots page template: {args.out}")


if __name__ == "__main__":
    main()
