//! moto with IAM authentication on, as an instance meets AWS: two roles assumed through STS
//! (their session tokens are real to moto), SecureString parameters, and then every request
//! signature and permission checked by moto itself. One instance runs, for the agent to tag.
//! The agent's tests (SSM, tags, the canary boot) sign with these credentials, served by the
//! IMDS emulator.

use crate::{python_with_botocore, run_python_args, Moto, REGION};

/// Credentials from a moto STS AssumeRole.
#[derive(Debug, Clone)]
pub struct RoleCredentials {
    pub role: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    /// RFC 3339, as IMDS gives it.
    pub expiration: String,
}

/// What [`start_with_roles`] set up.
pub struct MotoWithRoles {
    pub moto: Moto,
    /// May call ssm:GetParameter, kms:Decrypt, ec2:CreateTags, ec2:DescribeTags and
    /// ec2:DescribeInstances on everything.
    pub reader: RoleCredentials,
    /// May do nothing with SSM or EC2.
    pub outsider: RoleCredentials,
    /// A running instance (tagged `stackless:service=web`), made before IAM auth went on: the
    /// agent's tests tag it as its own instance.
    pub instance_id: String,
}

const SETUP: &str = r#"
import json, sys, boto3
endpoint, region, params = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
kw = dict(endpoint_url=endpoint, region_name=region,
          aws_access_key_id="AKIASETUPSETUPSETUP1", aws_secret_access_key="setup")
iam, sts, ssm, ec2 = (boto3.client(s, **kw) for s in ("iam", "sts", "ssm", "ec2"))
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
         "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
def role(name, actions):
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    c = sts.assume_role(RoleArn=arn, RoleSessionName="i-0123456789abcdef0")["Credentials"]
    return {"role": name, "access_key_id": c["AccessKeyId"], "secret_access_key": c["SecretAccessKey"],
            "token": c["SessionToken"], "expiration": c["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")}
for name, value in params.items():
    ssm.put_parameter(Name=name, Value=value, Type="SecureString")
out = {"reader": role("stackless-reader", ["ssm:GetParameter", "kms:Decrypt", "ec2:CreateTags",
                                           "ec2:DescribeTags", "ec2:DescribeInstances"]),
       "outsider": role("stackless-outsider", ["s3:ListBucket"])}
out["instance_id"] = ec2.run_instances(
    ImageId=ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"], MinCount=1, MaxCount=1,
    TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "stackless:service", "Value": "web"}]}],
)["Instances"][0]["InstanceId"]
import urllib.request
urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                              headers={"Content-Type": "text/plain"})).read()
json.dump(out, sys.stdout)
"#;

/// Starts moto, creates the roles and the parameters (`name -> SecureString value`), assumes
/// both roles, then switches moto's IAM authentication on.
pub fn start_with_roles(params: &[(&str, &str)]) -> MotoWithRoles {
    let moto = Moto::start();
    let params: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let out = run_python_args(
        &python_with_botocore(),
        SETUP,
        &[&moto.endpoint, REGION],
        serde_json::to_vec(&params).unwrap().as_slice(),
    );
    let out: serde_json::Value = serde_json::from_slice(&out).expect("setup JSON");
    let creds = |who: &str| {
        let field = |k: &str| out[who][k].as_str().expect("setup field").to_string();
        RoleCredentials {
            role: field("role"),
            access_key_id: field("access_key_id"),
            secret_access_key: field("secret_access_key"),
            token: field("token"),
            expiration: field("expiration"),
        }
    };
    MotoWithRoles {
        reader: creds("reader"),
        outsider: creds("outsider"),
        instance_id: out["instance_id"]
            .as_str()
            .expect("instance id")
            .to_string(),
        moto,
    }
}
