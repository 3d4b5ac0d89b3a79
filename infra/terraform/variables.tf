variable "region" {
  description = "AWS region of the bucket"
  type        = string
  default     = "eu-west-1"
}

variable "bucket_name" {
  description = "the artifacts bucket: DVC remote (dvc/), MLflow artifacts (mlflow/), generated images (generations/)"
  type        = string
}

variable "prefixes" {
  description = "the only key prefixes the pipeline may touch, by purpose"
  type        = map(string)
  default = {
    dvc         = "dvc"
    mlflow      = "mlflow"
    generations = "generations"
  }
}

variable "noncurrent_version_days" {
  description = "days an overwritten or deleted object version is kept before it expires"
  type        = number
  default     = 30
}

variable "eks_oidc_provider_arn" {
  description = "IAM OIDC provider of the EKS cluster; when set, IRSA roles are created for the Kubernetes service accounts below"
  type        = string
  default     = ""
}

variable "eks_oidc_provider_url" {
  description = "issuer URL of that provider without https:// (e.g. oidc.eks.eu-west-1.amazonaws.com/id/ABC)"
  type        = string
  default     = ""
}

variable "namespace" {
  description = "Kubernetes namespace of the Airflow release and the training pods"
  type        = string
  default     = "diffuse"
}

variable "pipeline_service_accounts" {
  description = "service accounts of pods that use DVC and write generations (Airflow task pods, scheduler)"
  type        = list(string)
  default     = ["diffuse-airflow-worker", "diffuse-airflow-scheduler"]
}

variable "mlflow_service_account" {
  description = "service account of the MLflow tracking server (the only user of the mlflow/ prefix)"
  type        = string
  default     = "mlflow"
}

variable "tags" {
  description = "tags on every resource"
  type        = map(string)
  default     = { project = "diffuse" }
}
