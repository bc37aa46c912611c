#!/usr/bin/env bash
# Install StarCraft II 4.10 (Linux) + the SMAC maps + oxwhirl's smac package, for --env smac.
#
#   bash install_sc2.sh [DIR]      DIR defaults to $SC2PATH, else ~/StarCraftII
#
# Downloads ~4 GB. By running it you accept Blizzard's AI and Machine Learning License
# (the archive password "iagreetotheeula" says so). `--env smax` needs none of this.
set -euo pipefail

SC2_URL="${SC2_URL:-https://blzdistsc2-a.akamaihd.net/Linux/SC2.4.10.zip}"
SC2_PASSWORD="iagreetotheeula"
MAPS_URL="${SMAC_MAPS_URL:-https://github.com/oxwhirl/smac/releases/download/v0.1-beta1/SMAC_Maps.zip}"
# NOTE: the PyPI package named "smac" is SMAC3 (hyper-parameter optimisation), a different
# project: StarCraft's SMAC must come from its git repository.
SMAC_PIP="${SMAC_PIP:-git+https://github.com/oxwhirl/smac.git}"

usage() {
    cat <<EOF
Usage: bash install_sc2.sh [DIR]

Installs StarCraft II 4.10 for Linux into DIR (default: \$SC2PATH, else ~/StarCraftII),
adds the SMAC maps under DIR/Maps/SMAC_Maps, and pip-installs oxwhirl's smac
($SMAC_PIP) into the project's .venv (the python the launch scripts run; created
if missing), or into \$PYTHON if you set it.
Needs curl or wget, and unzip; the download is unpacked next to DIR (not in /tmp).
SC2_URL / SMAC_MAPS_URL / SMAC_PIP override the sources (a mirror, a local checkout).
Prints the 'export SC2PATH=...' line to use afterwards.
EOF
}

die() { echo "install_sc2.sh: $*" >&2; exit 1; }

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
esac

DEST="${1:-${SC2PATH:-$HOME/StarCraftII}}"
if [ -z "${PYTHON:-}" ]; then  # the interpreter scripts/train_smac.sh runs (sets PYTHON)
    source "$(dirname "${BASH_SOURCE[0]}")/scripts/setup_env.sh"
fi

command -v unzip >/dev/null 2>&1 || die "unzip is required (e.g. apt-get install unzip)"
if command -v curl >/dev/null 2>&1; then
    fetch() { curl -fsSL --retry 2 --connect-timeout 20 -o "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
    fetch() { wget -q --tries=2 --timeout=20 -O "$2" "$1"; }
else
    die "curl or wget is required to download StarCraft II"
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no python found (set PYTHON=/path/to/python)"
# Before the ~4 GB download, not after it.
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip, which installs smac (set PYTHON=...)"

download() {  # download URL FILE WHAT
    echo "Downloading $3 from $1 (this can take a while) ..."
    if ! fetch "$1" "$2" 2>"$TMP/fetch.err"; then
        rm -f "$2"
        die "could not download $3 from $1: $(tail -n 1 "$TMP/fetch.err" | tr -d '\r')"
    fi
}

PARENT="$(dirname "$DEST")"
mkdir -p "$PARENT" || die "cannot create $PARENT"
TMP="$(mktemp -d "$PARENT/.install_sc2.XXXXXX")" || die "cannot write in $PARENT"
trap 'rm -rf "$TMP"' EXIT

if [ -d "$DEST/Versions" ]; then
    echo "StarCraft II already installed at $DEST"
else
    download "$SC2_URL" "$TMP/SC2.zip" "StarCraft II 4.10 (~4 GB)"
    echo "Unpacking StarCraft II into $DEST ..."
    unzip -q -P "$SC2_PASSWORD" "$TMP/SC2.zip" -d "$TMP/sc2" || die "could not unpack $TMP/SC2.zip"
    [ -d "$TMP/sc2/StarCraftII/Versions" ] || die "unexpected archive layout (no StarCraftII/Versions)"
    rm -f "$TMP/SC2.zip"
    if [ -d "$DEST" ]; then  # e.g. holding Maps/ already: merge
        cp -a "$TMP/sc2/StarCraftII/." "$DEST/" || die "could not copy StarCraft II into $DEST"
    else  # same filesystem (TMP is next to DEST): a rename, no second copy of ~4 GB
        mv "$TMP/sc2/StarCraftII" "$DEST" || die "could not move StarCraft II to $DEST"
    fi
fi

if [ -d "$DEST/Maps/SMAC_Maps" ]; then
    echo "SMAC maps already installed at $DEST/Maps/SMAC_Maps"
else
    download "$MAPS_URL" "$TMP/SMAC_Maps.zip" "the SMAC maps"
    mkdir -p "$DEST/Maps"
    unzip -q -o "$TMP/SMAC_Maps.zip" -d "$DEST/Maps" || die "could not unpack the SMAC maps"
    [ -d "$DEST/Maps/SMAC_Maps" ] || die "unexpected maps archive layout (no SMAC_Maps/)"
fi

echo "Installing oxwhirl's smac into $("$PYTHON" -c 'import sys; print(sys.prefix)') ..."
"$PYTHON" -m pip install "$SMAC_PIP" || die "pip install $SMAC_PIP failed"

DEST_ABS="$(cd "$DEST" && pwd)"
echo
echo "Done. Add this to your shell (the game is looked up there):"
echo "export SC2PATH=$DEST_ABS"
