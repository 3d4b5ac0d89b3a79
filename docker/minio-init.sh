#!/bin/sh
# One-shot of docker-compose.yaml (minio/mc image): create the bucket and the pipeline's own MinIO account,
# limited to the dvc/, mlflow/ and generations/ prefixes (the same least-privilege shape as the IAM policy in
# infra/terraform/). Safe to run again: every step tolerates what an earlier run left.
set -eu

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$S3_BUCKET"
mc version enable "local/$S3_BUCKET"

cat > /tmp/diffuse-policy.json <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Sid": "ListOwnPrefixes",
      "Effect": "Allow",
      "Action": ["s3:ListBucket"],
      "Resource": ["arn:aws:s3:::$S3_BUCKET"],
      "Condition": {"StringLike": {"s3:prefix": ["dvc/*", "mlflow/*", "generations/*"]}}
    },
    {
      "Sid": "BucketLocation",
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::$S3_BUCKET"]
    },
    {
      "Sid": "ReadWriteOwnPrefixes",
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                 "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::$S3_BUCKET/dvc/*", "arn:aws:s3:::$S3_BUCKET/mlflow/*",
                   "arn:aws:s3:::$S3_BUCKET/generations/*"]
    }
  ]
}
JSON

mc admin policy create local diffuse-pipeline /tmp/diffuse-policy.json
mc admin user add local "$DIFFUSE_S3_ACCESS_KEY" "$DIFFUSE_S3_SECRET_KEY"
mc admin policy attach local diffuse-pipeline --user "$DIFFUSE_S3_ACCESS_KEY" 2>/dev/null \
  || echo "policy diffuse-pipeline already attached to $DIFFUSE_S3_ACCESS_KEY"
echo "bucket $S3_BUCKET and account $DIFFUSE_S3_ACCESS_KEY ready"
