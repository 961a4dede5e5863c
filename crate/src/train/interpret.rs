//! Looking at a trained classifier's mistakes, as fastai's `ClassificationInterpretation`: the
//! confusion matrix, the most confused pairs, and the test images it got most wrong.
use tch::nn::ModuleT;
use tch::{Device, Kind};

use super::parallel::{to_device, StepOptions};
use crate::data::{DataLoader, ImageFolder};
use crate::display::{confusion_matrix_figure, show_images, Png};
use crate::error::{Error, Result};

/// A model's predictions over a data set, kept for looking at (fastai's
/// `ClassificationInterpretation.from_learner`).
#[derive(Clone, Debug)]
pub struct ClassificationInterpretation {
    dataset: ImageFolder,
    /// The true label of each image, in the data set's order.
    pub targets: Vec<i64>,
    /// The predicted label (the largest logit) of each image.
    pub preds: Vec<i64>,
    /// Softmax probabilities, one row an image, in class order.
    pub probs: Vec<Vec<f64>>,
    /// Cross-entropy of each image's true label (the chapter's loss, unreduced).
    pub losses: Vec<f64>,
}

impl ClassificationInterpretation {
    /// Runs `net` in eval mode without gradients over `data_iter` (not shuffled: its order is
    /// the data set's) on `device`.
    pub fn from_net(
        net: &impl ModuleT,
        data_iter: &DataLoader,
        device: Device,
    ) -> Result<ClassificationInterpretation> {
        if data_iter.is_shuffled() {
            return Err(Error::arg(
                "ClassificationInterpretation::from_net",
                "the loader shuffles; give one that reads the images in order (the test loader)",
            ));
        }
        let classes = data_iter.dataset().classes().len();
        let (mut targets, mut preds, mut probs, mut losses) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let opts = StepOptions::default();
        tch::no_grad(|| -> Result<()> {
            for batch in data_iter {
                let (x, y) = batch?;
                let x = to_device(&x, device, &opts)?;
                let logits = net
                    .forward_t(&x, false)
                    .f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Double)?;
                if logits.size().last() != Some(&(classes as i64)) {
                    return Err(Error::arg(
                        "ClassificationInterpretation::from_net",
                        format!(
                            "the model gives {:?} outputs for {classes} classes",
                            logits.size()
                        ),
                    ));
                }
                let log_p = logits.f_log_softmax(-1, None)?;
                let nll = log_p.f_gather(1, &y.f_unsqueeze(1)?, false)?.f_neg()?;
                losses.extend(Vec::<f64>::try_from(nll.f_flatten(0, -1)?)?);
                preds.extend(Vec::<i64>::try_from(logits.f_argmax(-1, false)?)?);
                let p = log_p.f_exp()?;
                for row in 0..p.size()[0] {
                    probs.push(Vec::<f64>::try_from(p.f_get(row)?)?);
                }
                targets.extend(Vec::<i64>::try_from(&y)?);
            }
            Ok(())
        })?;
        Ok(ClassificationInterpretation {
            dataset: data_iter.dataset().clone(),
            targets,
            preds,
            probs,
            losses,
        })
    }

    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        self.dataset.classes()
    }

    /// Counts `[actual][predicted]` (fastai's `confusion_matrix()`).
    pub fn confusion_matrix(&self) -> Vec<Vec<usize>> {
        let n = self.classes().len();
        let mut cm = vec![vec![0usize; n]; n];
        for (&a, &p) in self.targets.iter().zip(&self.preds) {
            cm[a as usize][p as usize] += 1;
        }
        cm
    }

    /// The fraction predicted right.
    pub fn accuracy(&self) -> f64 {
        let right = self
            .targets
            .iter()
            .zip(&self.preds)
            .filter(|(a, p)| a == p)
            .count();
        right as f64 / self.targets.len().max(1) as f64
    }

    /// fastai's `most_confused(min_val)`: (actual, predicted, count) off the diagonal with at
    /// least `min_val` images, most first.
    pub fn most_confused(&self, min_val: usize) -> Vec<(String, String, usize)> {
        let classes = self.classes();
        let mut pairs: Vec<(String, String, usize)> = Vec::new();
        for (a, row) in self.confusion_matrix().iter().enumerate() {
            for (p, &count) in row.iter().enumerate() {
                if a != p && count >= min_val.max(1) {
                    pairs.push((classes[a].clone(), classes[p].clone(), count));
                }
            }
        }
        pairs.sort_by(|x, y| y.2.cmp(&x.2).then_with(|| (&x.0, &x.1).cmp(&(&y.0, &y.1))));
        pairs
    }

    /// The indices (into the data set) of the `k` images with the highest loss, highest first
    /// (fastai's `top_losses(k)`).
    pub fn top_losses(&self, k: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.losses.len()).collect();
        order.sort_by(|&a, &b| self.losses[b].total_cmp(&self.losses[a]).then(a.cmp(&b)));
        order.truncate(k);
        order
    }

    /// fastai's `plot_confusion_matrix()`.
    pub fn plot_confusion_matrix(&self) -> Result<Png> {
        confusion_matrix_figure(&self.confusion_matrix(), self.classes())
    }

    /// fastai's `plot_top_losses(k)`: the `k` images with the highest loss in a grid of
    /// `ncols` columns, each titled `predicted/actual` over `loss / probability of the
    /// prediction`.
    pub fn plot_top_losses(&self, k: usize, ncols: usize) -> Result<Png> {
        let top = self.top_losses(k);
        if top.is_empty() || ncols == 0 {
            return Err(Error::arg(
                "plot_top_losses",
                format!(
                    "k = {k}, ncols = {ncols} over {} images: nothing to show",
                    self.losses.len()
                ),
            ));
        }
        let classes = self.classes();
        let mut imgs = Vec::with_capacity(top.len());
        let mut titles = Vec::with_capacity(top.len());
        for &i in &top {
            imgs.push(self.dataset.get(i)?.0);
            let (p, a) = (self.preds[i] as usize, self.targets[i] as usize);
            titles.push(format!(
                "{}/{}\n{:.2} / {:.2}",
                classes[p], classes[a], self.losses[i], self.probs[i][p]
            ));
        }
        let ncols = ncols.min(top.len());
        show_images(&imgs, top.len().div_ceil(ncols), ncols, Some(&titles), 2.0)
    }
}
