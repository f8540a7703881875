#!/usr/bin/env bash
# Debian 12 packages hotvm needs (QEMU, the demo guest's kernel and busybox, test servers).
# Installs only what is missing, so `make` stays fast on a machine that has them.
set -euo pipefail
packages=(
  qemu-system-x86 qemu-utils          # the hypervisor and qemu-img
  linux-image-amd64 busybox-static cpio   # the tiny demo guest
  zstd python3-venv
  openssh-client                      # ssh: the transport of sftp:// targets (targets/sftp.py)
  samba openssh-server openssl        # loopback SMB and SFTP servers for tests/test_targets.py (FTPS cert)
  vsftpd                              # loopback FTP(S) server, besides pyftpdlib (tests/servers.py VsftpdServer)
  smbclient curl lftp                 # the plain tools bench/target_throughput.py compares hotvm with
  postgresql                          # the Prefect server's database (scripts/prefect-server.sh)
  fdisk dosfstools ntfs-3g e2fsprogs  # partition and format guest file systems (file-level tests, hybrid restore)
  mtools fusefat                      # FAT without a kernel vfat module: test images (mtools), hybrid restore (fusefat)
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config   # libvirt driver (libvirt-python builds here)
  golang-go golang-github-vmware-govmomi-dev   # vcsim, the vSphere simulator, built offline from source
  qemu-guest-agent                    # put into the demo guest for quiesced (application-consistent) backups
  nbdkit nbdkit-plugin-python         # instant restore: the backup set served read-only over NBD (docs/instant.md)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "hotvm needs these Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Debian's FTP servers conflict with each other: never remove one this machine has (proftpd, pure-ftpd)
  # for the tests' vsftpd; those tests are skipped instead
  if [[ " ${missing[*]} " == *" vsftpd "* ]] \
      && apt-get install -s -qq --no-install-recommends vsftpd 2>/dev/null | grep -q '^Remv'; then
    echo "not installing vsftpd: it would replace this machine's FTP server (its tests are skipped)" >&2
    kept=()
    for p in "${missing[@]}"; do [ "$p" = vsftpd ] || kept+=("$p"); done
    missing=("${kept[@]}")
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # the tests start vsftpd themselves, on loopback: not the system's FTP service on port 21 (local logins,
  # plaintext passwords) that installing the package starts, under systemd or its init script
  if [[ " ${missing[*]} " == *" vsftpd "* ]]; then
    if [ -d /run/systemd/system ]; then
      systemctl disable --now vsftpd.service >/dev/null 2>&1 || true
    else
      update-rc.d vsftpd disable >/dev/null 2>&1 || true
      /etc/init.d/vsftpd stop >/dev/null 2>&1 || true
    fi
  fi
fi
