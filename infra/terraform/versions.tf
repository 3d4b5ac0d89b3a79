# S3 storage and a least-privilege IAM policy for the diffuse pipelines (docs/deploy.md, "S3 and IAM").
#   terraform init && terraform apply -var bucket_name=my-diffuse-artifacts
# Checked offline with checkov (`make lint-infra`); not applied from CI.
terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = var.tags
  }
}
