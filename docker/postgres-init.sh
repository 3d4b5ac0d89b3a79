#!/usr/bin/env bash
# Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d): one role and one
# database each for Airflow's metadata, MLflow's backend store and the prompt store, so no component can read
# or change another's tables. Passwords come from the environment (docker/.env) and reach SQL as psql
# variables (:'pw'), never spliced into the statement text.
set -euo pipefail

create() {  # ROLE DATABASE PASSWORD
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v role="$1" -v db="$2" -v pw="$3" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
}

create airflow airflow "${AIRFLOW_DB_PASSWORD:?}"
create mlflow mlflow "${MLFLOW_DB_PASSWORD:?}"
create diffuse prompts "${PROMPTS_DB_PASSWORD:?}"
