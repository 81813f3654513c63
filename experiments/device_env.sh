# Sourced by the GPU-machine scripts (accelerator_check.sh, accelerator_sweep.sh)
# from the repository root: installs the carried wheels of .whl/ (the GPU
# image lacks ml_collections; see accelerator_check.sh's header), puts the
# repository on PYTHONPATH and checks that python3 imports ml_collections and jax.

if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "device_env.sh: installing .whl/*.whl failed; going on with what is installed." >&2
  fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# The CIFAR-10 JPEGs travel packed (.datatar/cifar10.tar.gz, 16 MB): carried
# as a folder (46 MB of data, 197 MB on disk in 50,000 small files) the device
# tool refused them as over its 64 MiB limit (2026-11-29).
if [ ! -d .data/cifar10 ] && [ -f .datatar/cifar10.tar.gz ]; then
  mkdir -p .data && tar xzf .datatar/cifar10.tar.gz -C .data
fi

if ! python3 -c "import ml_collections, jax" 2>/dev/null; then
  echo "device_env.sh: python3 cannot import ml_collections and jax:" \
       "carry .whl (see the top of experiments/accelerator_check.sh)." >&2
  python3 -c "import ml_collections, jax"
  exit 1
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
