output "bucket" {
  value = aws_s3_bucket.artifacts.bucket
}

output "dvc_remote_url" {
  description = "DVC_REMOTE_URL for the Airflow workers"
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/${var.prefixes.dvc}"
}

output "mlflow_artifacts_destination" {
  description = "--artifacts-destination of the MLflow server"
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/${var.prefixes.mlflow}"
}

output "generation_artifact_root" {
  description = "generation.artifact_root in the pipeline config"
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/${var.prefixes.generations}"
}

output "policy_arns" {
  description = "least-privilege policies to attach to the pipeline and MLflow identities"
  value       = { for k, p in aws_iam_policy.prefix_access : k => p.arn }
}

output "role_arns" {
  description = "IRSA roles (eks.amazonaws.com/role-arn annotations), when eks_oidc_provider_arn is set"
  value       = { for k, r in aws_iam_role.irsa : k => r.arn }
}
