#!/usr/bin/env bash
# Register oneback's hooks on the OpenNebula front-end (run as oneadmin there).
#
#   install/register-hooks.sh AGENT_URL SECRET_FILE
#
# AGENT_URL    the agent's control endpoint, e.g. http://10.0.0.17:2640/v1/hook
# SECRET_FILE  a copy of the proxy VM's /etc/oneback/hook_secret
#
# Installs hooks/oneback-hook (Python standard library only) where oned's hook
# manager runs it, writes its configuration (0600), and registers the hook
# templates of hooks/*.hook with `onehook create` (existing ones are kept).
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,11p' "$0"; exit 2; }
url=$1
secret_src=$2
src=$(cd "$(dirname "$0")/.." && pwd)
dest=${ONE_LOCATION:-/var/lib/one}/remotes/hooks/oneback
conf_dir=/etc/one

umask 077
mkdir -p "$dest"
install -m 755 "$src/hooks/oneback-hook" "$dest/oneback-hook"
install -m 600 "$secret_src" "$conf_dir/oneback-hook.secret"
printf 'url = %s\nsecret_file = %s\ntimeout = 10\n' "$url" "$conf_dir/oneback-hook.secret" \
    > "$conf_dir/oneback-hook.conf"
chmod 600 "$conf_dir/oneback-hook.conf"

existing=$(onehook list --no-header -l NAME 2>/dev/null || true)
for tmpl in "$src"/hooks/oneback-vm-*.hook; do
    name=$(basename "$tmpl" .hook)
    if grep -qx "$name" <<<"$existing"; then
        echo "hook $name exists"
    else
        onehook create "$tmpl"
    fi
done
echo "hooks registered; test with: onehook show oneback-vm-update"
