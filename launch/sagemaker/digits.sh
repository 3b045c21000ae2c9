#!/usr/bin/env bash
# Train the digits example on 2 spot instances of 1 GPU each; checkpoints survive interruptions.
#
#   IMAGE=123456789012.dkr.ecr.us-east-1.amazonaws.com/igniter-dist:latest \
#   ROLE=arn:aws:iam::123456789012:role/SageMakerRole BUCKET=my-bucket \
#       launch/sagemaker/digits.sh                      # add --dry-run to print the request
#
# DATA=s3://... adds an input channel `data` (a folder with digits.npz); without it the example
# uses the copy bundled with scikit-learn. Extra launcher options go in "$@".
set -euo pipefail
: "${IMAGE:?set IMAGE to the ECR URI of the igniter-dist image (docker/README.md)}"
: "${ROLE:?set ROLE to the ARN of the SageMaker execution role}"
: "${BUCKET:?set BUCKET to an S3 bucket for code, outputs and checkpoints}"
cd "$(dirname "$0")/../.."

igniter-dist launch sagemaker examples/digits/train.py \
    --instance-count 2 --instance-type ml.g5.xlarge \
    --image "$IMAGE" --role "$ROLE" \
    --spot --max-run 3600 --max-wait 7200 \
    --checkpoint-s3-uri "s3://$BUCKET/igniter-dist/digits/checkpoints" \
    --s3-prefix "s3://$BUCKET/igniter-dist" \
    ${DATA:+--input "data=$DATA"} \
    "$@" \
    -- --max-epochs 10 --batch-size 64
