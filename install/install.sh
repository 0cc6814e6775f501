#!/usr/bin/env bash
# Install oneback on the proxy VM (run as root inside the VM, from a checkout).
#
#   install/install.sh [--root DIR] [--no-python] [--no-systemd]
#
# --root DIR     install under DIR instead of / (for packaging and tests)
# --no-python    do not create the virtualenv (it is created in /opt/oneback/venv)
# --no-systemd   do not enable and start the service
#
# Creates /etc/oneback (config, credentials and hook secret, all 0600),
# /var/lib/oneback, the systemd unit, and the LVM filter that keeps this VM
# from touching volume groups on the disks it reads. Existing files are kept.
set -euo pipefail

root=/
python=yes
systemd=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=$2; shift 2 ;;
        --no-python) python=no; shift ;;
        --no-systemd) systemd=no; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

src=$(cd "$(dirname "$0")/.." && pwd)
etc="$root/etc/oneback"
umask 077
mkdir -p "$etc" "$root/var/lib/oneback" "$root/etc/systemd/system" "$root/etc/lvm" \
         "$root/opt/oneback"

keep_or_write() {  # keep_or_write FILE MODE < content
    if [ -e "$1" ]; then
        echo "kept $1"; cat >/dev/null
    else
        cat >"$1"; chmod "$2" "$1"; echo "wrote $1"
    fi
}

keep_or_write "$etc/oneback.toml" 600 <"$src/install/oneback.toml.example"
keep_or_write "$etc/one_auth" 600 <<<"oneadmin:CHANGE-ME"
keep_or_write "$etc/hook_secret" 600 < <(head -c 32 /dev/urandom | base64)
keep_or_write "$root/etc/lvm/lvmlocal.conf" 644 <"$src/install/lvmlocal.conf"
install -m 644 "$src/install/oneback.service" "$root/etc/systemd/system/oneback.service"
echo "wrote $root/etc/systemd/system/oneback.service"

if [ "$python" = yes ]; then
    python3 -m venv "$root/opt/oneback/venv"
    "$root/opt/oneback/venv/bin/pip" install -q "$src"
    echo "installed oneback into $root/opt/oneback/venv"
fi
if [ "$systemd" = yes ] && [ "$root" = / ]; then
    systemctl daemon-reload
    systemctl enable oneback.service
    echo "enabled oneback.service: edit $etc/oneback.toml and $etc/one_auth, then"
    echo "  /opt/oneback/venv/bin/oneback init && systemctl start oneback"
fi
cat <<MSG
next: on the OpenNebula front-end, run install/register-hooks.sh with the
same secret ($etc/hook_secret) and this VM's address.
MSG
