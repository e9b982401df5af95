#!/usr/bin/env bash
# Train the six compare_models mnist5k variants of this study with `pyro-vae train`, seed 0, the
# overrides spelling out experiments/compare_models/config.yaml (base + variant), in two lanes of
# one torch thread each. Runs go to runs/inference_gap/<variant> (git-ignored).
#     bash experiments/inference_gap/train.sh            # from the repository root
set -u
RUNS=${RUNS:-runs/inference_gap}
BASE="data=mnist5k model.latent_dim=50 model.hidden=[200,200] model.activation=tanh prior=standard_normal
      guide=diagonal_normal likelihood=bernoulli objective=elbo objective.num_particles=1 train.epochs=100
      train.batch_size=100 train.lr=1.0e-3 train.early_stopping=true train.patience=10
      train.eval_batch_size=1000 eval.num_samples=null seed=0 progress=false"
declare -A VARIANT=(
  [vae]=""
  [iwae_k5]="objective=iwae objective.num_particles=5 objective.estimator=standard"
  [iwae_k50]="objective=iwae objective.num_particles=50 objective.estimator=standard"
  [mixture_prior]="prior=mixture prior.num_components=500"
  [iaf_guide]="guide=iaf guide.num_flows=2 guide.context_dim=50 guide.flow_hidden=[200]"
  [full_cov_guide]="guide=full_normal"
)
train() {  # train VARIANT: skip a finished run
  [ -f "$RUNS/$1/summary.json" ] && { echo "$1: done already"; return; }
  echo "$1: start $(date -u +%T)"
  OMP_NUM_THREADS=1 nice -n 10 pyro-vae train $BASE ${VARIANT[$1]} hydra.run.dir="$RUNS/$1" > "$RUNS/$1.log" 2>&1
  echo "$1: exit $? $(date -u +%T)"
}
mkdir -p "$RUNS"
train iwae_k50 &                                                   # the long one (~17 min on one core)
{ for v in vae iwae_k5 mixture_prior iaf_guide full_cov_guide; do train "$v"; done; } &
wait
