#!/usr/bin/env python3
"""Creates a Blob container on an Azure endpoint (Azurite in CI) with Shared Key auth, stdlib only.

Usage: azure_container.py <endpoint, e.g. http://127.0.0.1:10000/devstoreaccount1> <container>
Reads AZURE_ACCOUNT_NAME and AZURE_ACCOUNT_KEY. An existing container is fine.
"""
import base64, hashlib, hmac, os, sys, urllib.error, urllib.parse, urllib.request
from email.utils import formatdate

endpoint, container = sys.argv[1].rstrip("/"), sys.argv[2]
account, key = os.environ["AZURE_ACCOUNT_NAME"], os.environ["AZURE_ACCOUNT_KEY"]
url = f"{endpoint}/{container}?restype=container"
path = urllib.parse.urlparse(url).path
headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
canon_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
ctype = "application/octet-stream"  # urllib would add a form type for a body; sign what is sent
to_sign = "PUT\n" + "\n" * 4 + ctype + "\n" + "\n" * 6 + canon_headers + f"/{account}{path}\nrestype:container"
sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(url, method="PUT", data=b"", headers={**headers, "Content-Type": ctype, "Authorization": f"SharedKey {account}:{sig}"})
try:
    urllib.request.urlopen(req, timeout=30)
    print(f"container {container} created")
except urllib.error.HTTPError as e:
    if e.code == 409:
        print(f"container {container} exists")
    else:
        sys.exit(f"creating container {container}: HTTP {e.code} {e.read().decode(errors='replace')}")
