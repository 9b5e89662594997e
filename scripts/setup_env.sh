#!/usr/bin/env bash
# Create .venv and install shrink with its dev extra, idempotently.
#
# Order matters: torch==2.13.0 goes in first (a CPU build is on local disk; an
# unpinned torch would pull gigabytes of CUDA packages), then everything else
# under a constraint that forbids replacing it. Packages that only ship as
# source (compiled C/C++, e.g. llama-cpp-python ~10 min on 2 cores) are built
# once into a wheel cache outside the repository and reused from there.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
WHEELHOUSE=${SHRINK_WHEELHOUSE:-$HOME/.cache/shrink/wheels}
# Packages built from source into $WHEELHOUSE once (pip spec per line).
SOURCE_BUILT=${SOURCE_BUILT:-llama-cpp-python==0.3.36}
EXTRAS=${EXTRAS:-dev}

# The report's browser test loads report.html in Debian's headless Chromium. Installed
# here (before the early exit, so an existing venv gets it too) when missing and we
# may: root with apt-get. Without it that test skips; nothing else needs it.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (apt-get) for the report's browser test" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1; then
        echo "setup: WARNING: could not install chromium; the report's browser test will skip" >&2
    fi
fi

stamp="$VENV/.shrink-installed"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import shrink, torch" 2>/dev/null; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

have_torch=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ "${have_torch%%+*}" != "$TORCH_VERSION" ]; then
    echo "setup: installing torch==$TORCH_VERSION first" >&2
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

constraints="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$constraints"

mkdir -p "$WHEELHOUSE"
for spec in $SOURCE_BUILT; do
    name=${spec%%[=<>]*}
    norm=$(echo "$name" | tr '-' '_')
    if ! ls "$WHEELHOUSE"/"$norm"-*.whl >/dev/null 2>&1; then
        echo "setup: building $spec into $WHEELHOUSE (once)" >&2
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
            "${PIP[@]}" wheel --no-deps -c "$constraints" -w "$WHEELHOUSE" "$spec"
    fi
done

echo "setup: installing shrink[$EXTRAS]" >&2
"${PIP[@]}" install -c "$constraints" --find-links "$WHEELHOUSE" -e ".[$EXTRAS]"

got=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
if [ "${got%%+*}" != "$TORCH_VERSION" ]; then
    echo "setup: ERROR: torch was replaced ($got installed, $TORCH_VERSION required)." >&2
    echo "setup: a dependency asked for another torch; pin it or drop it." >&2
    exit 1
fi
echo "$want" > "$stamp"
