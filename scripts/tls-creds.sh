#!/usr/bin/env bash
# Makes TLS credentials in QEMU's tls-creds-x509 layout (and a tls-creds-psk key file):
#   DIR/server/  ca-cert.pem server-cert.pem server-key.pem   (object endpoint=server)
#   DIR/client/  ca-cert.pem client-cert.pem client-key.pem   (object endpoint=client)
#   DIR/rogue/   a client whose certificate comes from another CA (must be refused)
#   DIR/psk/     keys.psk with identity "qemu"
# Usage: scripts/tls-creds.sh DIR [SERVER-NAME]   (default name: localhost; 127.0.0.1 and ::1 are always in the SANs)
set -euo pipefail
dir=${1:?usage: tls-creds.sh DIR [SERVER-NAME]}
name=${2:-localhost}
mkdir -p "$dir"/{server,client,rogue,psk,.ca}
cd "$dir"
days=3650
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ca() { # ca NAME
  ec .ca/$1-key.pem
  openssl req -x509 -new -key .ca/$1-key.pem -days $days -subj "/CN=Ferry test CA $1" \
    -addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign,cRLSign -out .ca/$1-cert.pem 2>/dev/null
}
leaf() { # leaf CA OUT-PREFIX CN EXT
  ec "$2-key.pem"
  openssl req -new -key "$2-key.pem" -subj "/CN=$3" -out .ca/req.csr 2>/dev/null
  printf '%s\n' "$4" > .ca/ext.cnf
  openssl x509 -req -in .ca/req.csr -CA .ca/$1-cert.pem -CAkey .ca/$1-key.pem -CAcreateserial \
    -days $days -extfile .ca/ext.cnf -out "$2-cert.pem" 2>/dev/null
}

ca main
ca other
leaf main server/server "$name" "basicConstraints=CA:false
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1,IP:::1"
leaf main client/client "ferry-source" "basicConstraints=CA:false
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
leaf other rogue/client "rogue-source" "basicConstraints=CA:false
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
cp .ca/main-cert.pem server/ca-cert.pem
cp .ca/main-cert.pem client/ca-cert.pem
cp .ca/main-cert.pem rogue/ca-cert.pem
echo "qemu:$(openssl rand -hex 32)" > psk/keys.psk
chmod 600 server/*-key.pem client/*-key.pem rogue/*-key.pem psk/keys.psk
echo "$dir"
