#!/usr/bin/env python3
"""Creates an IAM user with an S3 access key on a moto server started with
INITIAL_NO_AUTH_ACTION_COUNT=3 (the three calls here are the unauthenticated ones; moto checks
every request's signature after them). Prints "<access key id> <secret>".

Usage: moto_iam_key.py <port>
"""
import json, sys
import boto3

endpoint = f"http://127.0.0.1:{sys.argv[1]}"
iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="shmback")                                        # 1
key = iam.create_access_key(UserName="shmback")["AccessKey"]               # 2
policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
iam.put_user_policy(UserName="shmback", PolicyName="s3", PolicyDocument=json.dumps(policy))  # 3
print(key["AccessKeyId"], key["SecretAccessKey"])
