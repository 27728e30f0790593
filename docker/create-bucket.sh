#!/bin/sh
# One-shot setup of the MinIO server of docker-compose.yml, safe to run again: create the
# bucket, and a user with Sealer's access key that may use this bucket and nothing else.
set -eu

alias_name=sealer-minio
policy_name=sealer-bucket
policy_file="${TMPDIR:-/tmp}/sealer-bucket-policy.json"

mc alias set "$alias_name" http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "$alias_name/$SEALER_S3_BUCKET"

cat >"$policy_file" <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:*"],
      "Resource": ["arn:aws:s3:::$SEALER_S3_BUCKET", "arn:aws:s3:::$SEALER_S3_BUCKET/*"]
    }
  ]
}
POLICY
mc admin policy create "$alias_name" "$policy_name" "$policy_file"

# Adding an existing user sets its secret key again, so a changed .env takes effect.
mc admin user add "$alias_name" "$SEALER_S3_ACCESS_KEY_ID" "$SEALER_S3_SECRET_ACCESS_KEY"

# Attaching a policy that is already attached fails, so look first.
if mc admin user info "$alias_name" "$SEALER_S3_ACCESS_KEY_ID" | grep -q "$policy_name"; then
    echo "user $SEALER_S3_ACCESS_KEY_ID already has policy $policy_name"
else
    mc admin policy attach "$alias_name" "$policy_name" --user "$SEALER_S3_ACCESS_KEY_ID"
fi

echo "bucket $SEALER_S3_BUCKET is ready for access key $SEALER_S3_ACCESS_KEY_ID"
