#!/usr/bin/env bash
# Re-captures the ClientHello fixtures in this folder on loopback.
# Each capture: a one-shot listener on 127.0.0.1 writes the first bytes a client
# sends (until 1 s of silence) to a file and closes; the client then fails its
# handshake, which is expected. Needs python3, openssl and curl.
set -euo pipefail
cd "$(dirname "$0")"

listen() { # listen PORT FILE: accept one connection, dump what it sends
    python3 - "$1" "$2" <<'PY' &
import socket, sys
port, path = int(sys.argv[1]), sys.argv[2]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(1)
conn, _ = srv.accept()
conn.settimeout(1.0)
data = b""
try:
    while len(data) < 65536:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
except socket.timeout:
    pass
open(path, "wb").write(data)
conn.close()
PY
    sleep 0.5
}

capture() { # capture FILE CLIENT-COMMAND...
    local file=$1 port=$((20000 + RANDOM % 20000))
    shift
    listen "$port" "$file"
    PORT=$port timeout 5 bash -c "$*" </dev/null >/dev/null 2>&1 || true
    wait
    echo "$file: $(stat -c %s "$file") bytes"
}

capture openssl_sni_alpn.bin \
    'openssl s_client -connect 127.0.0.1:$PORT -servername example.com -alpn h2,http/1.1'
capture openssl_no_sni.bin \
    'openssl s_client -connect 127.0.0.1:$PORT -noservername -alpn http/1.1'
capture curl_sni.bin \
    'curl -sk --connect-to api.example.com:443:127.0.0.1:$PORT https://api.example.com/'
capture curl_tls12.bin \
    'curl -sk --tls-max 1.2 --connect-to legacy.example.org:443:127.0.0.1:$PORT https://legacy.example.org/'
capture python_ssl.bin \
    'python3 -c "
import os, socket, ssl
ctx = ssl.create_default_context()
ctx.set_alpn_protocols([\"h2\"])
s = socket.create_connection((\"127.0.0.1\", int(os.environ[\"PORT\"])))
ctx.wrap_socket(s, server_hostname=\"Reviews.Default.svc.cluster.local\")
"'
