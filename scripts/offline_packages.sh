#!/usr/bin/env bash
# Gathers, on a machine with a network, what a machine without one (the GPU machine) lacks to
# build and test t2i-fast: the C++ loader's libraries (liblmdb, libjpeg-turbo, zlib: runtime
# and development files) unpacked into DIR/sysroot, and the py-lmdb wheel for CPython 3.12 on
# x86-64 in DIR/wheels. scripts/gpu_check.sh builds against them.
#
#   bash scripts/offline_packages.sh [DIR]       # DIR defaults to offline/
#
# The .deb files come from this machine's apt sources (Debian or Ubuntu, amd64); the
# libraries need only an old glibc (MANIFEST.txt lists the newest symbol version each one
# needs), so they also run on a newer distribution than the one they come from.
set -euo pipefail

dir=${1:-offline}
python=${PYTHON:-python3}

# Debian calls the JPEG packages libjpeg62-turbo, Ubuntu libjpeg-turbo8.
apt_opts=()
if [ "$(dpkg --print-architecture)" != amd64 ]; then
  # The GPU machine is x86-64: read amd64 package lists beside this machine's own.
  lists=${TMPDIR:-/tmp}/t2i-amd64-lists
  mkdir -p "$lists/partial"
  apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
  apt-get "${apt_opts[@]}" update -qq
fi
known() {
  local policy
  policy=$(apt-cache "${apt_opts[@]}" policy "$1" 2>/dev/null)
  [[ $policy == *"Candidate:"* && $policy != *"Candidate: (none)"* ]]
}
if ! known liblmdb-dev; then
  echo "apt knows no liblmdb-dev: updating the package lists (needs root)" >&2
  apt-get "${apt_opts[@]}" update -qq
fi
jpeg=(libjpeg62-turbo libjpeg62-turbo-dev)
known libjpeg62-turbo-dev || jpeg=(libjpeg-turbo8 libjpeg-turbo8-dev)
packages=(liblmdb0 liblmdb-dev "${jpeg[@]}" zlib1g zlib1g-dev)

rm -rf "$dir/debs" "$dir/sysroot" "$dir/wheels"
mkdir -p "$dir/debs" "$dir/sysroot" "$dir/wheels"
# As root, apt-get warns that its sandbox user cannot write here: harmless.
(cd "$dir/debs" && apt-get "${apt_opts[@]}" download -qq "${packages[@]}")
sysroot=$(cd "$dir/sysroot" && pwd)
for deb in "$dir"/debs/*.deb; do
  dpkg-deb -x "$deb" "$sysroot"
done

# Make the tree self-contained, for compilers and CMake that know nothing of it:
multiarch=x86_64-linux-gnu
libdir=$sysroot/usr/lib/$multiarch
# - one library folder: pre-usrmerge packages (zlib1g) put theirs in /lib;
if [ -d "$sysroot/lib/$multiarch" ]; then
  cp -a "$sysroot/lib/$multiarch/." "$libdir/"
  rm -rf "${sysroot:?}/lib"
fi
# - links that point inside the tree, not at this machine's /lib (libz.so -> /lib/...);
for link in "$libdir"/*.so; do
  target=$(readlink "$link")
  if [[ $target == /* ]]; then
    ln -sfn "$(basename "$target")" "$link"
  fi
done
# - jconfig.h beside jpeglib.h: only the system compiler searches the multiarch folder;
cp -n "$sysroot/usr/include/$multiarch"/*.h "$sysroot/usr/include/"
# - no static archives (they are not position-independent: a shared module cannot take
#   them) and no documentation.
rm -rf "${sysroot:?}/usr/share" "${libdir:?}"/*.a
for lib in liblmdb.so libjpeg.so libz.so; do
  [ -e "$libdir/$lib" ] || { echo "$libdir/$lib is missing or a broken link" >&2; exit 1; }
done

"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$dir/wheels" lmdb

{
  echo "made by scripts/offline_packages.sh on" \
    "$(sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for deb in "$dir"/debs/*.deb; do
    echo "deb $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)"
  done
  for lib in "$libdir"/*.so.*.*; do
    newest=n/a
    if command -v objdump >/dev/null; then
      newest=$(objdump -T "$lib" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)
    fi
    echo "lib $(basename "$lib") needs ${newest:-no versioned glibc symbol}"
  done
  for wheel in "$dir"/wheels/*.whl; do echo "wheel $(basename "$wheel")"; done
} >"$dir/MANIFEST.txt"
cat "$dir/MANIFEST.txt"
echo "$(du -sh "$dir" | cut -f1) in $dir"
