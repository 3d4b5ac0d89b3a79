# Least privilege: two policies, each limited to its own key prefixes of the artifacts bucket.
#   pipeline: dvc/ (DVC remote: dataset_update pushes, retrain pulls) + generations/ (batch_generate writes)
#   mlflow:   mlflow/ (the tracking server proxies every artifact, so clients and training pods need no S3 access)
# Nothing may touch other keys, list other prefixes, change the bucket, or use the KMS key outside S3.

locals {
  roles = {
    pipeline = [var.prefixes.dvc, var.prefixes.generations]
    mlflow   = [var.prefixes.mlflow]
  }
}

data "aws_iam_policy_document" "prefix_access" {
  for_each = local.roles

  statement {
    sid       = "ListOwnPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.artifacts.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [for p in each.value : "${p}/*"]
    }
  }

  statement {
    sid       = "BucketMetadata"
    actions   = ["s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid = "ReadWriteOwnPrefixes"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject", # DVC gc, MLflow run deletion
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [for p in each.value : "${aws_s3_bucket.artifacts.arn}/${p}/*"]
  }

  statement {
    sid       = "UseBucketKeyThroughS3"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.artifacts.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "prefix_access" {
  for_each    = local.roles
  name        = "diffuse-${each.key}-s3"
  description = "diffuse ${each.key}: read/write on s3://${var.bucket_name}/{${join(",", each.value)}}/ only"
  policy      = data.aws_iam_policy_document.prefix_access[each.key].json
}

# ------------------------------------------------------------------ IRSA (EKS service accounts), optional

locals {
  irsa_enabled = var.eks_oidc_provider_arn != ""
  irsa_subjects = {
    pipeline = [for sa in var.pipeline_service_accounts : "system:serviceaccount:${var.namespace}:${sa}"]
    mlflow   = ["system:serviceaccount:${var.namespace}:${var.mlflow_service_account}"]
  }
}

data "aws_iam_policy_document" "irsa_trust" {
  for_each = local.irsa_enabled ? local.irsa_subjects : {}

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.eks_oidc_provider_url}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.eks_oidc_provider_url}:sub"
      values   = each.value
    }
  }
}

resource "aws_iam_role" "irsa" {
  for_each           = local.irsa_enabled ? local.irsa_subjects : {}
  name               = "diffuse-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.irsa_trust[each.key].json
}

resource "aws_iam_role_policy_attachment" "irsa" {
  for_each   = local.irsa_enabled ? local.irsa_subjects : {}
  role       = aws_iam_role.irsa[each.key].name
  policy_arn = aws_iam_policy.prefix_access[each.key].arn
}
