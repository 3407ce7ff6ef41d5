"""Put a Ray cluster-launcher node's secrets in place, from AWS Secrets Manager (run in the image).

    python /app/infra/launcher/node_secrets.py --secret-id mvcustom/ray-cluster --region us-west-2

The secret's value is a JSON object: ``ray_auth_token`` (required) goes to ``~/.ray/auth_token``,
where Ray looks for the token once ``RAY_AUTH_MODE=token``; every other key named like an
environment variable (``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``, ...) goes to ``~/.mvcustom/env``, shell-quoted, which the start
command sources before ``ray start`` so every Ray worker inherits it. Both files are created with
mode 0600 and never printed. Credentials come from the node's IAM instance profile, so nothing
secret is in the launcher YAML or its ``file_mounts`` (Ray's launcher does not distribute tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
TOKEN_KEY = "ray_auth_token"


def fetch_secret(secret_id: str, region: str) -> dict:
    """The secret's JSON object (botocore: the image has it through s3fs; boto3 may be absent)."""
    import botocore.session

    client = botocore.session.get_session().create_client("secretsmanager", region_name=region)
    raw = client.get_secret_value(SecretId=secret_id)["SecretString"]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"secret {secret_id!r} is not a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError(f"secret {secret_id!r} is not a JSON object")
    return value


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # also when the file existed with wider permissions


def install(secret: dict, home: Path) -> tuple[Path, Path]:
    """Write the token file and the env file under ``home``; returns their paths."""
    token = str(secret.get(TOKEN_KEY) or "").strip()
    if not token:
        raise ValueError(f"the secret has no {TOKEN_KEY!r}")
    bad = [k for k in secret if k != TOKEN_KEY and not ENV_NAME.match(k)]
    if bad:
        raise ValueError(f"secret keys must be {TOKEN_KEY!r} or environment variable names, got {bad}")
    token_path, env_path = home / ".ray" / "auth_token", home / ".mvcustom" / "env"
    _write_private(token_path, token)
    lines = [f"{k}={shlex.quote(str(v))}\n" for k, v in sorted(secret.items()) if k != TOKEN_KEY]
    _write_private(env_path, "".join(lines))
    return token_path, env_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secret-id", required=True, help="Secrets Manager secret name or ARN")
    ap.add_argument("--region", required=True, help="AWS region of the secret")
    args = ap.parse_args(argv)
    token_path, env_path = install(fetch_secret(args.secret_id, args.region), Path.home())
    print(f"[node_secrets] wrote {token_path} and {env_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
