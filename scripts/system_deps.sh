#!/usr/bin/env bash
# Install the Debian packages the built-in demo corpus renders with. Never fatal: the corpus
# builder reports which sources are missing and uses what is there.
set -u
need=()
command -v fluidsynth >/dev/null 2>&1 || need+=(fluidsynth)
[ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ] || need+=(fluid-soundfont-gm)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
[ ${#need[@]} -eq 0 ] && exit 0
echo "finelap: installing Debian packages for the demo corpus: ${need[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  $SUDO apt-get update -qq >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
    || echo "finelap: WARNING: apt-get install ${need[*]} failed; the demo corpus will use what is available."
else
  echo "finelap: WARNING: cannot install ${need[*]} (no apt-get or no root); the demo corpus will use what is available."
fi
exit 0
