# Sourced by test.sh: the Python the tests use. A virtual environment under target/ holds the
# pinned packages of tests/python/requirements.txt (the MCP SDK, pytest, and matplotlib/numpy for
# the agent's Python driver run on the host), so the suite needs nothing from the system Python
# but `python3 -m venv` (Debian: python3-venv, which setup.sh installs). It is made once and
# remade when the requirements change; its bin/ goes first on PATH.
_venv="$PWD/target/test-venv"
_want="$(cat tests/python/requirements.txt scripts/test-env.sh | sha256sum | cut -c1-16)"
if [ ! -x "$_venv/bin/python3" ] || [ "$(cat "$_venv/.requirements-key" 2>/dev/null)" != "$_want" ]; then
  echo "capsule tests: making the test Python environment in target/test-venv" >&2
  if ! python3 -m venv --clear "$_venv"; then
    echo "capsule tests: python3 -m venv failed; install it with: apt-get install python3-venv" >&2
    exit 1
  fi
  "$_venv/bin/python3" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  echo "$_want" > "$_venv/.requirements-key"
fi
export PATH="$_venv/bin:$PATH"
unset _venv _want
