#!/usr/bin/env bash
# aarch64 smoke test of lstmlab under qemu-user: an arm64 Debian bookworm tree, an aarch64 CPU torch wheel from
# PyPI, then benchmarks/aarch64_smoke.py inside it (import, fused forward and backward against nn.LSTM and the
# reference backend on the Python loops, then the same on the compiled C++ loops built by the tree's own g++).
#
#   benchmarks/aarch64_smoke.sh [REPO]          REPO: the lstmlab checkout to test (default: the one holding
#                                                this script); its src/ is copied into the tree on every run.
#   LSTMLAB_ARM64_DIR   cache of the tree, wheels and logs (default ${XDG_CACHE_HOME:-~/.cache}/lstmlab-arm64);
#                       kept between runs, so a rerun only copies the source and runs the checks (~2-4 min).
#   LSTMLAB_ARM64_TORCH torch version to install (default 2.10.0: the newest whose aarch64 wheel on PyPI is a CPU
#                       build; PyPI's aarch64 wheels of 2.11.0 and later, 2.13.0 included, are CUDA 13 builds
#                       needing the nvidia/cuda-toolkit wheels, ~430 MB of libtorch_cuda.so alone)
#   LSTMLAB_ARM64_NATIVE=0  skip the compiled-loops phase.
#
# Needs root (apt-get, debootstrap, chroot). No binfmt handler is registered on the machine: every command in the
# tree runs in a private user+mount+pid namespace with its own binfmt_misc instance (Linux >= 6.7), where
# qemu-aarch64-static is registered with the F flag, then chroot. Exit status: 0 when every check passed, 1 on a
# mismatch or a failed phase (the compiled-loops build failing counts: its one-line error is printed).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${1:-$here/..}" && pwd)" || { echo "no such repository: ${1:-}" >&2; exit 2; }
[ -d "$repo/src/lstmlab" ] || { echo "$repo has no src/lstmlab" >&2; exit 2; }
dir="${LSTMLAB_ARM64_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lstmlab-arm64}"
torch_version="${LSTMLAB_ARM64_TORCH:-2.10.0}"
root="$dir/rootfs"
venv=/opt/venv                      # inside the tree
site="$venv/lib/python3.11/site-packages"
mirror="$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)"
[ -n "$mirror" ] || mirror="$(sed -n 's/^deb \(http[^ ]*debian\)\/* bookworm .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -1)"
mirror="${mirror:-http://deb.debian.org/debian}"
mkdir -p "$dir/logs"
status=0
results=()

t_start=$(date +%s)
phase_t0=0
phase() { phase_name="$1"; phase_t0=$(date +%s); echo "== $1"; }
phase_end() {  # phase_end OK|FAIL|SKIP [detail]
  local dt=$(( $(date +%s) - phase_t0 ))
  results+=("$(printf '%-5s %-34s %5ss  %s' "$1" "$phase_name" "$dt" "${2:-}")")
  echo "   $1 ($dt s) ${2:-}"
  [ "$1" = FAIL ] && status=1
  return 0
}

# Run a command inside the arm64 tree: a private binfmt_misc instance with qemu-aarch64-static (F: opened now,
# so it need not exist inside the tree), ids 0-65535 mapped to themselves, the host's /dev and /sys bound in, a fresh /proc, then chroot. Lower priority:
# the machine is shared. Environment is reset to a small known one.
in_arm() {
  nice -n 10 unshare --user --mount --pid --fork --propagation private /bin/sh -c '
      set -e
      while [ -z "$(cat /proc/self/uid_map)" ]; do sleep 0.05; done   # until the parent has written the id maps
      root="$1"; shift
      mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
      printf "%s" ":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F" \
        > /proc/sys/fs/binfmt_misc/register
      mount --rbind /dev "$root/dev"
      mount --rbind /sys "$root/sys"   # torch'"'"'s cpuinfo reads /sys/devices/system/cpu
      mount -t proc proc "$root/proc"
      exec env -i PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 OMP_NUM_THREADS=1 MAX_JOBS=1 ${ARM_ENV:-} chroot "$root" "$@"
    ' in_arm "$root" "$@" &
  local pid=$! me
  me="$(readlink /proc/self/ns/user)"
  while [ "$(readlink "/proc/$pid/ns/user" 2>/dev/null)" = "$me" ]; do sleep 0.05; done
  # ids 0-65535 mapped to themselves (newuidmap, which unshare --map-users needs, is not installed here):
  # the tree's files keep their real owners, and dpkg can chown to system users
  echo "0 0 65536" > "/proc/$pid/uid_map" && echo "0 0 65536" > "/proc/$pid/gid_map"
  wait "$pid"
}

# -- 1. host tools ---------------------------------------------------------------------------------------------
phase "host tools (qemu-user-static, debootstrap)"
if command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null; then
  phase_end OK "present: $(qemu-aarch64-static --version | head -1)"
elif { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap; } \
       > "$dir/logs/apt.log" 2>&1; then
  phase_end OK "installed: $(qemu-aarch64-static --version | head -1)"
else
  phase_end FAIL "apt-get install failed: $(tail -1 "$dir/logs/apt.log")"; printf '%s\n' "${results[@]}"; exit 1
fi

# -- 2. arm64 rootfs -------------------------------------------------------------------------------------------
phase "arm64 rootfs (debootstrap, 2 stages)"
if [ -f "$dir/.rootfs-done" ]; then
  phase_end OK "cached: $root"
else
  ok=1
  if [ ! -f "$dir/.stage1-done" ]; then
    rm -rf "$root"
    if debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,g++ \
         bookworm "$root" "$mirror" > "$dir/logs/debootstrap-1.log" 2>&1; then
      touch "$dir/.stage1-done"
    else
      ok=0; err="first stage: $(tail -1 "$dir/logs/debootstrap-1.log")"
    fi
  fi
  if [ $ok = 1 ]; then
    # container=lxc: no mknod in a user namespace, so debootstrap skips its mknod test and keeps the bound /dev
    if ARM_ENV=container=lxc in_arm /debootstrap/debootstrap --second-stage > "$dir/logs/debootstrap-2.log" 2>&1; then
      touch "$dir/.rootfs-done"
    else
      ok=0; err="second stage: $(grep -E '^(E|W):' "$dir/logs/debootstrap-2.log" | tail -1)"
    fi
  fi
  if [ $ok = 1 ]; then phase_end OK "$root from $mirror"; else
    phase_end FAIL "$err (logs in $dir/logs)"; printf '%s\n' "${results[@]}"; exit 1; fi
fi
echo "   $(in_arm /usr/bin/python3 -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])' 2>&1)"

# -- 3. venv with the aarch64 wheels ---------------------------------------------------------------------------
# The wheels are fetched and unpacked by the host's pip (--platform, no emulation: ~10x faster than pip under
# qemu), with --no-deps and torch's requirements named here, since pip evaluates environment markers against the
# host. The venv itself is made by the tree's python3.
phase "venv + aarch64 wheels (torch $torch_version)"
# setuptools: torch.utils.cpp_extension imports it to build the compiled loops
pkgs=("torch==$torch_version" numpy tqdm safetensors ninja setuptools filelock "typing-extensions>=4.10"
      "sympy>=1.13.3" mpmath "networkx>=2.5.1" jinja2 markupsafe "fsspec>=0.8.5")
stamp="$dir/.venv-done-$(echo "${pkgs[*]}" | md5sum | cut -c1-12)"   # a new package list makes a new venv
if [ -f "$stamp" ]; then
  phase_end OK "cached: $root$venv"
else
  rm -rf "$root$venv" "$dir"/.venv-done-*
  if in_arm /usr/bin/python3 -m venv --without-pip "$venv" > "$dir/logs/venv.log" 2>&1 &&
     python3 -m pip install -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
       --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --python-version 3.11 \
       --implementation cp --abi cp311 --abi abi3 --abi none --target "$root$site" --upgrade \
       "${pkgs[@]}" >> "$dir/logs/venv.log" 2>&1; then
    # console scripts got the host's python in their shebang: point them at the venv's, and move them to its bin
    for f in "$root$site"/bin/*; do
      [ -f "$f" ] || continue
      sed -i '1s|^#!.*python.*$|#!/opt/venv/bin/python3|' "$f"; mv -f "$f" "$root$venv/bin/"
    done
    rmdir "$root$site/bin" 2>/dev/null
    touch "$stamp"
    phase_end OK "$(cd "$root$site" && ls -d torch-*.dist-info numpy-*.dist-info ninja-*.dist-info | tr '\n' ' ')"
  else
    phase_end FAIL "$(grep -E 'ERROR|Error' "$dir/logs/venv.log" | tail -1) (log: $dir/logs/venv.log)"
    printf '%s\n' "${results[@]}"; exit 1
  fi
fi

# -- 4. the source ---------------------------------------------------------------------------------------------
phase "copy source ($repo)"
rm -rf "$root/opt/lstmlab"
mkdir -p "$root/opt/lstmlab"
cp -r "$repo/src" "$root/opt/lstmlab/src"
cp "$here/aarch64_smoke.py" "$root/opt/lstmlab/aarch64_smoke.py"
find "$root/opt/lstmlab" -name __pycache__ -prune -exec rm -rf {} +
rev="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
dirty="$(git -C "$repo" status --porcelain 2>/dev/null | grep -q . && echo ' (+ uncommitted changes)')"
phase_end OK "commit $rev${dirty:-}"
smoke() { ARM_ENV="PYTHONPATH=/opt/lstmlab/src LSTMLAB_CACHE_DIR=/tmp/lstmlab-cache $*" \
            in_arm /opt/venv/bin/python3 /opt/lstmlab/aarch64_smoke.py; }

# -- 5. Python loops -------------------------------------------------------------------------------------------
phase "checks, Python loops (LSTMLAB_NATIVE=0)"
smoke LSTMLAB_NATIVE=0 2>&1 | tee "$dir/logs/smoke-python.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 0 ]; then phase_end OK; else phase_end FAIL "exit $rc"; fi

# -- 6. compiled loops -----------------------------------------------------------------------------------------
if [ "${LSTMLAB_ARM64_NATIVE:-1}" = 0 ]; then
  phase "native build"; phase_end SKIP "LSTMLAB_ARM64_NATIVE=0"
else
  rm -rf "$root/tmp/lstmlab-cache"   # build the current source, never a library cached by an earlier run
  phase "native build (python -m lstmlab.nn._native)"
  ARM_ENV="PYTHONPATH=/opt/lstmlab/src LSTMLAB_CACHE_DIR=/tmp/lstmlab-cache" \
    in_arm /opt/venv/bin/python3 -m lstmlab.nn._native -v > "$dir/logs/native-build.log" 2>&1
  rc=$?
  if [ "$rc" = 0 ]; then
    phase_end OK "$(tail -1 "$dir/logs/native-build.log")"
    phase "checks, compiled loops (LSTMLAB_NATIVE=1)"
    smoke LSTMLAB_NATIVE=1 2>&1 | tee "$dir/logs/smoke-native.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then phase_end OK; else phase_end FAIL "exit $rc"; fi
  else
    # the compiler's or loader's first error line, else the last line of the log
    err="$(grep -m1 -E 'error:|error\b|Error:|cannot|unrecognized|not supported' "$dir/logs/native-build.log" \
           || tail -1 "$dir/logs/native-build.log")"
    phase_end FAIL "exit $rc: $(echo "$err" | sed 's/^ *//' | cut -c1-300) (log: $dir/logs/native-build.log)"
  fi
fi

echo
echo "== summary (repo $repo, commit $rev${dirty:-}; cache $dir; total $(( $(date +%s) - t_start )) s)"
printf '%s\n' "${results[@]}"
[ "$status" = 0 ] && echo "aarch64 smoke: PASS" || echo "aarch64 smoke: FAIL"
exit "$status"
