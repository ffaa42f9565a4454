# capsule's bash driver: written to the stdin of an interactive bash (--norc
# --noprofile --noediting -i +m) when a bash context starts. Each cell then
# arrives as BASH_CELL_COMMAND (rootfs/agent/src/context/driver.rs) on stdin,
# with the cell's source on fd 3; the driver reports on fd 4.
set +o history
unset HISTFILE PROMPT_COMMAND MAILCHECK
PS1='' PS2='' PS0=''
printf '{"t":"ready"}\n' >&4
